"""Data layer: dataset source, schema, loading, patient-level split, preprocessing."""
