# FindTensorRT: TensorRT ships no CMake package, so find its headers and libnvinfer.
#
# Looks under TensorRT_ROOT (CMake variable or environment variable; a tarball's top folder or
# an install prefix), then the system paths (Debian packages put them in /usr/include/*-linux-gnu
# and /usr/lib/*-linux-gnu).
#
# Sets TensorRT_FOUND, TensorRT_INCLUDE_DIR, TensorRT_LIBRARY, TensorRT_VERSION (from
# NvInferVersion.h) and the imported target TensorRT::nvinfer.
#
# The version: TensorRT 10.16 and 11.x headers define NV_TENSORRT_MAJOR as an alias,
#   #define TRT_MAJOR_ENTERPRISE 11
#   #define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE
# where earlier ones write the number itself; an alias is followed to its number here.

find_path(TensorRT_INCLUDE_DIR NvInfer.h
  HINTS ${TensorRT_ROOT} ENV TensorRT_ROOT
  PATH_SUFFIXES include)
find_library(TensorRT_LIBRARY NAMES nvinfer nvinfer_11 nvinfer_10
  HINTS ${TensorRT_ROOT} ENV TensorRT_ROOT
  PATH_SUFFIXES lib lib64 lib/x64)

# The value of `#define NAME VALUE` in `text`, an alias followed once to its number; "" if none.
function(_tensorrt_define text name out)
  set(value "")
  if(text MATCHES "#define[ \t]+${name}[ \t]+([0-9]+)")
    set(value "${CMAKE_MATCH_1}")
  elseif(text MATCHES "#define[ \t]+${name}[ \t]+([A-Za-z_][A-Za-z0-9_]*)")
    set(alias "${CMAKE_MATCH_1}")
    if(text MATCHES "#define[ \t]+${alias}[ \t]+([0-9]+)")
      set(value "${CMAKE_MATCH_1}")
    endif()
  endif()
  set(${out} "${value}" PARENT_SCOPE)
endfunction()

set(TensorRT_VERSION "")
if(TensorRT_INCLUDE_DIR AND EXISTS "${TensorRT_INCLUDE_DIR}/NvInferVersion.h")
  file(READ "${TensorRT_INCLUDE_DIR}/NvInferVersion.h" _tensorrt_version_h)
  foreach(part MAJOR MINOR PATCH BUILD)
    _tensorrt_define("${_tensorrt_version_h}" "NV_TENSORRT_${part}" _tensorrt_${part})
  endforeach()
  if(NOT _tensorrt_MAJOR STREQUAL "" AND NOT _tensorrt_MINOR STREQUAL "" AND NOT _tensorrt_PATCH STREQUAL "")
    set(TensorRT_VERSION "${_tensorrt_MAJOR}.${_tensorrt_MINOR}.${_tensorrt_PATCH}")
    if(NOT _tensorrt_BUILD STREQUAL "")
      string(APPEND TensorRT_VERSION ".${_tensorrt_BUILD}")
    endif()
  endif()
  unset(_tensorrt_version_h)
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(TensorRT
  REQUIRED_VARS TensorRT_LIBRARY TensorRT_INCLUDE_DIR
  VERSION_VAR TensorRT_VERSION)

if(TensorRT_FOUND AND NOT TARGET TensorRT::nvinfer)
  add_library(TensorRT::nvinfer UNKNOWN IMPORTED)
  set_target_properties(TensorRT::nvinfer PROPERTIES
    IMPORTED_LOCATION "${TensorRT_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${TensorRT_INCLUDE_DIR}")
endif()
mark_as_advanced(TensorRT_INCLUDE_DIR TensorRT_LIBRARY)
