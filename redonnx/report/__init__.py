"""What a run returns and shows: the result, its report tables, HTML and plots."""
