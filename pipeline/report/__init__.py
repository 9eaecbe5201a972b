"""Results folders (`results`, one writer), figures (`figures`), the study's tables and `report` (`tables`), the HTML page (`html`)."""
