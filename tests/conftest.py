import os

# Tests share one persistent XLA compilation cache so repeated engine builds load executables.
os.environ.setdefault("JAXLLM_COMPILATION_CACHE",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "xla"))
