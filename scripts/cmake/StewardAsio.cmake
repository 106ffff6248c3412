# Defines the INTERFACE target steward::asio: standalone Asio >= 1.28 on the io_uring backend (or
# epoll), with the compile definitions every translation unit must agree on (mixing them is an ODR
# break), plus liburing. Used by the build tree and by the installed package alike.
#
# In:  STEWARD_ASIO_INCLUDE_DIR (optional hint), STEWARD_IO_BACKEND (io_uring | epoll)
if(TARGET steward::asio)
    return()
endif()

find_path(STEWARD_ASIO_INCLUDE_DIR asio.hpp HINTS ${STEWARD_ASIO_INCLUDE_DIR} DOC "Asio include directory")
if(NOT STEWARD_ASIO_INCLUDE_DIR OR NOT EXISTS "${STEWARD_ASIO_INCLUDE_DIR}/asio/version.hpp")
    message(FATAL_ERROR "steward: standalone Asio >= 1.28 not found. Run scripts/setup, or pass "
                        "-DSTEWARD_ASIO_INCLUDE_DIR=<dir containing asio.hpp>.")
endif()
file(STRINGS "${STEWARD_ASIO_INCLUDE_DIR}/asio/version.hpp" _steward_asio_line REGEX "^#define ASIO_VERSION ")
string(REGEX MATCH "[0-9]+" _steward_asio_version "${_steward_asio_line}")
if(_steward_asio_version LESS 102800)
    math(EXPR _major "${_steward_asio_version} / 100000")
    math(EXPR _minor "${_steward_asio_version} / 100 % 1000")
    math(EXPR _patch "${_steward_asio_version} % 100")
    message(FATAL_ERROR "steward: Asio ${_major}.${_minor}.${_patch} in ${STEWARD_ASIO_INCLUDE_DIR} is too "
        "old; steward needs Asio >= 1.28. Older io_uring backends leave cancel/timeout SQEs with stale "
        "user_data under liburing >= 2.2 (fixed 1.27), free per-object state while cancels are in "
        "flight (fixed 1.28) and leave run_for timeouts behind (fixed 1.28.1). Run scripts/setup, which "
        "fetches Debian 13's header-only libasio-dev on Debian 12.")
endif()

find_package(PkgConfig REQUIRED)
pkg_check_modules(STEWARD_LIBURING REQUIRED IMPORTED_TARGET GLOBAL liburing>=2.1)
find_package(Threads REQUIRED)

# Named with the namespace itself (no alias): the exported link interface of steward::steward then
# reads `steward::asio`, which CMake insists is a target, instead of a bare name it would turn
# into -lsteward_asio if this file were not loaded first.
add_library(steward::asio INTERFACE IMPORTED GLOBAL)
target_include_directories(steward::asio SYSTEM INTERFACE "${STEWARD_ASIO_INCLUDE_DIR}")
target_compile_definitions(steward::asio INTERFACE ASIO_STANDALONE ASIO_NO_DEPRECATED)
if(STEWARD_IO_BACKEND STREQUAL "io_uring")
    target_compile_definitions(steward::asio INTERFACE ASIO_HAS_IO_URING ASIO_DISABLE_EPOLL STEWARD_IO_URING_BACKEND=1)
elseif(STEWARD_IO_BACKEND STREQUAL "epoll")
    target_compile_definitions(steward::asio INTERFACE STEWARD_IO_URING_BACKEND=0)
else()
    message(FATAL_ERROR "steward: STEWARD_IO_BACKEND must be io_uring or epoll, not '${STEWARD_IO_BACKEND}'")
endif()
# liburing is linked in both builds: the start-up probe uses it to explain a blocked io_uring.
target_link_libraries(steward::asio INTERFACE PkgConfig::STEWARD_LIBURING Threads::Threads)
