"""The analysis side: runs read back from their records and compared, and claims with their verdicts.
It imports no training code."""
