"""MLPerf results: reading logs (logs), scoring a series (score), showing it (report), running and
keeping series of runs (series), packaging them (package), and the system description (system_desc)."""
