"""Tools that read and copy finished databases: verify, stage, merge."""
