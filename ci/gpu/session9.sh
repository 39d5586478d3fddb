#!/usr/bin/env bash
# Session 9's device run (through ci/gpu/bg.sh): the whole GPU leg with its summary table,
# then the admission A/B on the same machine.
bash ci/gpu/all.sh
echo "== admission A/B ($(date +%T))"
bash ci/gpu/admission_ab.sh
