"""Shipped job configs (YAML). ``papo train --config NAME`` finds ``NAME.yaml`` here."""
