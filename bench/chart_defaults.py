"""What the Helm chart runs the services with by default, read from its values file, so that the
benchmarks judge the platform as it is deployed and cannot drift from the chart."""

from __future__ import annotations

from pathlib import Path

import yaml

_VALUES = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "medledger" / "values.yaml"

# tracing.samplingRatio (MEDLEDGER_TRACE_SAMPLING_RATIO): the fraction of new traces sampled.
TRACE_SAMPLING = float(yaml.safe_load(_VALUES.read_text())["tracing"]["samplingRatio"])
