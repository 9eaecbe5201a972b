"""Results folders (`results`, one writer), a result read back and named (`read`), figures (`figures`), the
study's tables and the `report` command (`tables`), the HTML page (`html`)."""
