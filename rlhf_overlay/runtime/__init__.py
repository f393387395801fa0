"""Run plumbing: run folders, launch/hostfiles, locks and waits, status, checkpoints, health guards."""
