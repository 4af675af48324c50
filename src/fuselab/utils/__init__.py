"""Small helpers shared by every stage: errors, strict configs, atomic outputs, progress, hashing."""
