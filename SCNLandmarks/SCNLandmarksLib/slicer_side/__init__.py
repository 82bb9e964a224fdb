"""The only engine code that touches 3D Slicer: the MRML adapter and installing requirements."""
