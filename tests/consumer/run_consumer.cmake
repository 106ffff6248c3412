# Builds and runs tests/consumer against steward, as a user would, in a scratch directory:
#   MODE=package       install the build tree to a prefix, find_package(steward) from there
#   MODE=subdirectory  add_subdirectory(<steward source tree>) into a fresh build
# cmake -DMODE=... -DSTEWARD_SOURCE_DIR=... -DSTEWARD_BINARY_DIR=... -DWORK_DIR=...
#       -DCXX_COMPILER=... -DBUILD_TYPE=... -DGENERATOR=... -DIO_BACKEND=... -DASIO_INCLUDE_DIR=...
#       -P run_consumer.cmake
# A consumer that finds io_uring blocked prints STEWARD_CONSUMER_SKIPPED (CTest reports a skip).
cmake_minimum_required(VERSION 3.25)

foreach(var MODE STEWARD_SOURCE_DIR STEWARD_BINARY_DIR WORK_DIR CXX_COMPILER GENERATOR IO_BACKEND)
    if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
        message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
    endif()
endforeach()
# The parent build's configuration ($<CONFIG>); empty for a single-config build without one.
set(config_args)
if(BUILD_TYPE)
    set(config_args --config ${BUILD_TYPE})
endif()

function(step what)
    execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "consumer (${MODE}): ${what} failed (${rc}):\n${out}")
    endif()
    message(STATUS "consumer (${MODE}): ${what}: ok")
    set(step_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(consumer_args
    -S "${STEWARD_SOURCE_DIR}/tests/consumer" -B "${WORK_DIR}/build" -G "${GENERATOR}"
    -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=${BUILD_TYPE}
    -DSTEWARD_CONSUMER_MODE=${MODE} -DSTEWARD_CONSUMER_EXPECTED_BACKEND=${IO_BACKEND}
    # No package registries: the package must come from the prefix below (checked after configuring).
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)

if(MODE STREQUAL "package")
    # What `make install` needs must exist even when only some targets were built before.
    step("building steward" ${CMAKE_COMMAND} --build "${STEWARD_BINARY_DIR}" ${config_args}
         --target steward steward_cli steward_tracker_daemon)
    step("installing to ${WORK_DIR}/prefix" ${CMAKE_COMMAND} --install "${STEWARD_BINARY_DIR}"
         ${config_args} --prefix "${WORK_DIR}/prefix")
    foreach(installed lib/cmake/steward/steward-config.cmake lib/cmake/steward/steward-config-version.cmake
                      include/steward/unique_fd.hpp include/steward/io/backend_probe.hpp bin/steward libexec/steward-tracker)
        if(NOT EXISTS "${WORK_DIR}/prefix/${installed}")
            message(FATAL_ERROR "consumer (package): ${installed} was not installed")
        endif()
    endforeach()
    file(GLOB installed_library "${WORK_DIR}/prefix/lib*/libsteward.*")
    if(NOT installed_library)
        message(FATAL_ERROR "consumer (package): libsteward was not installed")
    endif()
    # The installed programs start from the prefix (nothing points back into the build tree).
    foreach(program bin/steward libexec/steward-tracker)
        step("running installed ${program} --version" "${WORK_DIR}/prefix/${program}" --version)
        if(NOT step_output MATCHES "^steward")
            message(FATAL_ERROR "consumer (package): ${program} --version printed: ${step_output}")
        endif()
    endforeach()
    list(APPEND consumer_args -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
elseif(MODE STREQUAL "subdirectory")
    list(APPEND consumer_args -DSTEWARD_SOURCE_DIR=${STEWARD_SOURCE_DIR} -DSTEWARD_IO_BACKEND=${IO_BACKEND})
    if(ASIO_INCLUDE_DIR)
        list(APPEND consumer_args -DSTEWARD_ASIO_INCLUDE_DIR=${ASIO_INCLUDE_DIR})
    endif()
else()
    message(FATAL_ERROR "run_consumer.cmake: MODE must be package or subdirectory, not '${MODE}'")
endif()

step("configuring tests/consumer" ${CMAKE_COMMAND} ${consumer_args})
if(MODE STREQUAL "package")
    # The package must have come from the fresh prefix, not from anywhere else on the machine.
    file(STRINGS "${WORK_DIR}/build/CMakeCache.txt" found REGEX "^steward_DIR:")
    if(NOT found MATCHES "=${WORK_DIR}/prefix/")
        message(FATAL_ERROR "consumer (package): steward was found elsewhere: ${found}")
    endif()
endif()
step("building tests/consumer" ${CMAKE_COMMAND} --build "${WORK_DIR}/build" ${config_args} --parallel 2)

find_program(consumer_exe steward_consumer PATHS "${WORK_DIR}/build" "${WORK_DIR}/build/${BUILD_TYPE}"
             NO_DEFAULT_PATH REQUIRED)
step("running steward_consumer" "${consumer_exe}")
message(STATUS "${step_output}")
if(step_output MATCHES "STEWARD_CONSUMER_SKIPPED")
    return()  # CTest's SKIP_REGULAR_EXPRESSION reports it
endif()
if(NOT step_output MATCHES "steward consumer: ok")
    message(FATAL_ERROR "consumer (${MODE}): unexpected output:\n${step_output}")
endif()
file(REMOVE_RECURSE "${WORK_DIR}")  # kept for inspection only when something failed
