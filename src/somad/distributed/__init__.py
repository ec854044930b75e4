"""Beyond one machine: Ray batch scoring and distributed fitting."""
