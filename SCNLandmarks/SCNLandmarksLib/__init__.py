"""SCNLandmarksLib: the SpatialConfiguration-Net landmark engine (Slicer and Qt imports only in slicer_side).

One sub-package per concept; each may import only those listed before it:

* ``common``: atomic writes, user-facing errors, progress, device, user folders;
* ``imaging``: images in physical space, file I/O, the network grid, intensity, augmentation;
* ``data``: landmarks, landmark files, training cases, data sets, the case store, synthetic and sample data;
* ``models``: networks, heatmaps, local refinement, expected error, model files, the catalog;
* ``inference``: detection, batches, overlays, accuracy evaluation;
* ``learning``: training, the step loop, fine-tuning, torchrun, fitting the expected-error model;
* ``running``: the ``scn-landmarks`` command line and the background worker;
* ``slicer_side``: the MRML adapter and installing requirements inside Slicer (the only Slicer imports).

Frames and axis order are defined in :mod:`SCNLandmarksLib.imaging.geometry`.
"""

__version__ = "0.1.0"
