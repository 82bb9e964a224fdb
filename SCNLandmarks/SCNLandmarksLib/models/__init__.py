"""The landmark model: networks, heatmaps, local refinement, expected error, model files, catalog."""
