"""Landmarks and annotated cases: landmark files, data sets, the case store, synthetic and sample data."""
