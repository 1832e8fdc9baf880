"""Named search spaces (YAML), shipped as package data: `tieify search --space NAME`."""
