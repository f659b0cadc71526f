"""Analytics (issue 23, docs/analytics.md): the figures the API answers, computed from
the hourly rollups' counts. Pure policy: no I/O; ``store.analytics`` reads the counts
and ``control.analytics`` serves them."""
