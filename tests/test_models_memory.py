"""models.reuse_freed_memory: keeps freed arrays in the heap, results unchanged."""
import platform

import pytest


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc mallopt")
def test_reuse_freed_memory_takes_effect_and_arrays_still_work(tmp_path):
    import subprocess
    import sys

    # In a child process: the setting is process-wide and lasts for the process.
    code = (
        "import numpy as np, models\n"
        "assert models.reuse_freed_memory()\n"
        "for _ in range(3):\n"
        "    a = np.ones(1 << 23, np.float32); b = a * 2\n"
        "    assert b.sum() == 2 * a.size\n"
        "    del a, b\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

