# Warnings and sanitizers for steward's own targets only: never global flags.
function(steward_apply_warnings target)
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow -Wconversion
                           -Wno-sign-conversion -Werror=return-type)
    if(STEWARD_SANITIZE)
        target_compile_options(${target} PRIVATE -fsanitize=${STEWARD_SANITIZE} -fno-omit-frame-pointer
                               -fno-sanitize-recover=all)
        if(CMAKE_CXX_COMPILER_ID STREQUAL "Clang" AND STEWARD_SANITIZE MATCHES "undefined")
            # clang 14's -fsanitize=function cannot emit C++20 coroutine frames ("Cannot represent a
            # difference across sections"); the rest of UBSan stays on.
            target_compile_options(${target} PRIVATE -fno-sanitize=function)
        endif()
        target_link_options(${target} PRIVATE -fsanitize=${STEWARD_SANITIZE})
    endif()
endfunction()
