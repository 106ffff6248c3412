# One bounded fuzzing run as a CTest test: the checked-in seed corpus is copied to a scratch
# directory (new inputs land there, never in the source tree), the fuzzer runs for SECONDS, and
# any crash, leak, sanitizer report or failed invariant fails the test with the reproducer's path.
# -D FUZZER=<exe> CORPUS=<seed dir> WORK_DIR=<scratch> SECONDS=<n> ARGS=<flags separated by |>
foreach(var FUZZER CORPUS WORK_DIR SECONDS)
    if(NOT DEFINED ${var})
        message(FATAL_ERROR "run_fuzzer.cmake: -D${var}=... is required")
    endif()
endforeach()
string(REPLACE "|" ";" extra "${ARGS}")

file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR}/corpus ${WORK_DIR}/artifacts)
file(GLOB seeds ${CORPUS}/*)
if(NOT seeds)
    message(FATAL_ERROR "no seed inputs in ${CORPUS}")
endif()
file(COPY ${seeds} DESTINATION ${WORK_DIR}/corpus)
list(LENGTH seeds seed_count)
message(STATUS "${FUZZER}: ${seed_count} seeds, ${SECONDS} s")

execute_process(
    COMMAND ${FUZZER} -max_total_time=${SECONDS} -print_final_stats=1
            -artifact_prefix=${WORK_DIR}/artifacts/ ${extra} ${WORK_DIR}/corpus
    WORKING_DIRECTORY ${WORK_DIR}
    RESULT_VARIABLE rc)
file(GLOB corpus_after ${WORK_DIR}/corpus/*)
list(LENGTH corpus_after corpus_count)
file(GLOB artifacts ${WORK_DIR}/artifacts/*)
if(NOT rc EQUAL 0 OR artifacts)
    message(FATAL_ERROR "${FUZZER} failed (exit ${rc}); reproducer(s): ${artifacts}\n"
            "Rerun one with: ${FUZZER} <reproducer>")
endif()
message(STATUS "corpus grew from ${seed_count} to ${corpus_count} inputs; no crash")
