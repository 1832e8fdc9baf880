"""Ready-to-run search recipes (YAML), shipped as package data: `tieify search NAME`."""
