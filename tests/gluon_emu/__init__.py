"""A CPU emulator for attnrt's Gluon sm90 kernels, and a runner that checks them against float64.

What it models: fake ``triton.experimental.gluon`` modules (fake.py) whose ops run on torch CPU
tensors, so the kernels' own Python source runs line by line: program ids over the launch grid;
``gl.warp_specialize`` partitions as Python threads; mbarriers with arrival counts, expected
transaction bytes and phase parity, whose waits block (sync.py); TMA loads as copies of the
box with zero fill past the tensor's bounds, completing the barrier's transaction bytes; TMA
reduce-adds as float32 adds clipped to the tensor; wgmma as float32 matmuls of the 16-bit
operands (the tensor cores' rounding of products, not of their order); global loads and stores
through masked pointer offsets. A wait that does not complete within the timeout is reported as
a deadlock, naming every stuck partition and the kernel line it waits at.

What it does not model: the async proxy (a wgmma or TMA runs to completion when issued, so a
slot released before its product finished, a missing fence or store_wait goes unnoticed); real
register and shared-memory layouts, swizzles, bank conflicts, register pressure; TMA hardware
limits (alignment, box sizes, descriptor encoding); warps inside a partition; compilation
(a kernel that fails to compile for sm90 can pass here); performance.

The fakes replace modules in sys.modules, so they are installed only in a subprocess:
``python -m tests.gluon_emu.run`` (run.py). Never import fake.py inside the pytest process.
"""
