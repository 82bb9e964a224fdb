# Extension metadata, included by the top-level CMakeLists.txt before find_package(Slicer).
# EXTENSION_HOMEPAGE, EXTENSION_ICONURL, EXTENSION_SCREENSHOTURLS and EXTENSION_DEPENDS are set in
# CMakeLists.txt itself (the Extensions Index reads them from that file's text); each value has
# one home.

set(EXTENSION_NAME SCNLandmarks)
set(EXTENSION_CATEGORY "Quantification")
set(EXTENSION_CONTRIBUTORS "SCNLandmarks contributors")
set(EXTENSION_DESCRIPTION "Detect anatomical landmarks on 2D images and 3D volumes with a SpatialConfiguration-Net, correct them as editable point lists, fine-tune the model on your corrected cases in the background, and detect on whole folders.")
set(EXTENSION_STATUS "Beta")
