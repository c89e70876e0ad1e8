"""Developer tooling: the quantize-stage benchmark and synthetic models (`qpipe bench`, `qpipe synth-model`)."""
