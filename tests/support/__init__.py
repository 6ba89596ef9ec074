"""What the tests start and write besides the project: an HTTP server with faults, OpenSSH servers,
a fake Backend.AI manager (for newer managers' answers), the user's backend.ai client, synthetic MLPerf
logs and a slow Invoke step. Imported as tests.support.NAME."""
