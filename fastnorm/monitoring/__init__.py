"""Training-health monitoring: per-update diagnostics, alert rules with the seed analyses'
thresholds, the Monitor that applies them (logging and TensorBoard), and ``fastnorm scan`` over
past runs' TensorBoard event files.

    diagnostics  RunningNorm's per-update diagnostics as named tensors (no host sync)
    rules        the alert rules and their default thresholds
    monitor      Monitor: rules applied to each update's metrics
    events       a small reader of TensorBoard event files
    scan         the scan of past runs for the failure signature (``fastnorm scan``)
    scan_plot    its chart
"""

from fastnorm.monitoring.monitor import Monitor

__all__ = ["Monitor"]
