#!/bin/sh
# Counts forever, one number a line: a checkpoint/restore must continue the sequence.
i=${START:-0}
while true; do echo "$i"; i=$((i+1)); sleep "${STEP:-0.1}"; done
