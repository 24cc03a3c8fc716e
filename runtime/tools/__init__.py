"""Tools: the attnrt command line, benchmark and tune."""
