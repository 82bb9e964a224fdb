"""Using a trained model: detection on one image or a folder, overlays, accuracy evaluation."""
