"""
The statistics' settings: confidence, test level, power, resampling counts and the rules'
thresholds, each with the reason for its value. Every statistics module reads them from here.
"""
CONFIDENCE = 0.95
ALPHA = 0.05             # level of the tests, after the Holm correction
POWER = 0.8              # power at which the minimum detectable difference is quoted
N_PERMUTATIONS = 9999    # permutation tests: exact enumeration when there are fewer distinct splits
SEED = 0                 # fixed, so the same files give the same p-values
N_RESAMPLES = 2000       # seed bootstrap of the FFN study's best-of-k (best_of_k_bootstrap)
# Fewest trials from which an interval is given (below: ci None and a note saying why). The
# jackknife needs 3; tests/test_calibration.py's simulations (figures in docs/analysis.md) show its 95% intervals covering the truth in >= 90% of studies from 3 trials on.
MIN_TRIALS_FOR_CI = 3
# A trial is flagged as an outlier when its mean pair value to the other trials is at least this
# many times the mean pair value among the other trials (trial_diagnostics). Of simulated studies
# whose trials' noise scale varies by exp(0.2 N(0, 1)), 1-3% get a trial flagged; a trial with 4x
# the noise scores ~2.3 and is flagged in >= 86% of studies holding one (benchmarks/calibration.py).
OUTLIER_RATIO = 1.5
# Default equivalence margin, relative to the baseline's mean pair value (equivalence_test). 25%:
# the smallest margin at which the test can conclude anything at this project's trial counts
# (power 0.74 at 10 + 10 trials with equal spreads, level <= 0.057; at 10% its power stays
# <= 0.05 even at 20 + 20: benchmarks/calibration.py), and still below what averaging two
# models buys (about -30%: the ensemble yardstick), so "equally reproducible" means closer
# than the cheapest remedy moves it.
EQUIVALENCE_MARGIN = 0.25
