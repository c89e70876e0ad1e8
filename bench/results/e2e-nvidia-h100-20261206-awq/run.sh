#!/usr/bin/env bash
# session 18 (2026-12-06): asked for nvidia-h200, ran on an H100 80GB HBM3 (the kinds serve for each other);
# bench/mixed-length.sh at commit 100a1d4 with AWQ, short variant (w warm-up, p1 packed+tuned, off = tuning: off
# one text per sample; calibrate and quantize only), carrying .whl/main and .carry
RECIPE=awq SHORT=1 exec bash bench/mixed-length.sh
