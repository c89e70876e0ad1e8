#!/usr/bin/env bash
# session 18 (2026-12-06), nvidia-h200, one call: bench/mixed-length.sh at commit 7803ef9, carrying .whl/main and .carry
# (w warm-up, p1 packed+tuned, off = tuning: off one text per sample, offpack, kl p1,offpack, p2, GPU pytest)
exec bash bench/mixed-length.sh
