"""L-inf attacks on image classifiers: PGD, CW, MS-PGD, APGD, FAB, Square, AutoAttack (METHODS.md B.4-B.5)."""
