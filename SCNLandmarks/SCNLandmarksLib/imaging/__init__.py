"""Images in physical space: file I/O, the network grid, intensity, preprocessing, augmentation."""
