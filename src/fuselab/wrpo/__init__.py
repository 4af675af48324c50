"""wrpo stage."""
