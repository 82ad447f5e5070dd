import os

# Tests compare the kernels themselves: no NumPy stand-ins while a child compiles them.
os.environ.setdefault("FASTKERN_BACKGROUND_COMPILE", "0")
