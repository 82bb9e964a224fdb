# Extension metadata, read by the top-level CMakeLists.txt before find_package(Slicer).
# The Slicer extension build and the Extensions Index take these EXTENSION_* variables.

set(EXTENSION_NAME SCNLandmarks)
set(EXTENSION_HOMEPAGE "https://github.com/SCNLandmarks/SlicerSCNLandmarks")
set(EXTENSION_CATEGORY "Quantification")
set(EXTENSION_CONTRIBUTORS "SCNLandmarks contributors")
set(EXTENSION_DESCRIPTION "Detect anatomical landmarks on 2D images and 3D volumes with a SpatialConfiguration-Net, correct them as editable point lists, fine-tune the model on your corrected cases in the background, and detect on whole folders.")
set(EXTENSION_ICONURL "https://raw.githubusercontent.com/SCNLandmarks/SlicerSCNLandmarks/main/Resources/SCNLandmarks.png")
set(EXTENSION_SCREENSHOTURLS "https://raw.githubusercontent.com/SCNLandmarks/SlicerSCNLandmarks/main/Docs/Screenshot.png")
# torch comes from the PyTorch extension (PyTorch Utils installs the build matching the GPU).
set(EXTENSION_DEPENDS "PyTorch")
set(EXTENSION_STATUS "Beta")
