"""Test-only: bitsandbytes' AVX512-BF16 CPU path (``Linear4bit.forward`` in eval mode without grad, on CPUs with
avx512_bf16) repacks the 4-bit weight with ``absmax`` reshaped to [out, in_features // blocksize], which is
[out, 0] for layers narrower than the 64-wide quantization block: the tiny test models' 32-wide layers fail there
(bitsandbytes 0.50.1 and 0.50.2); real models' layers are wider. Turned off for the tests: imported by
test_quantized_base.py, and at start-up by its subprocesses (this folder on their PYTHONPATH)."""

try:
    import bitsandbytes.nn.modules as _bnb_modules
except ImportError:  # bitsandbytes not installed: nothing to turn off
    pass
else:
    _bnb_modules.has_avx512bf16 = lambda: False
