"""One BentoML service per model family. Each declares its packaged model at class scope."""
