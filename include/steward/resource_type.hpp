#pragma once
/// @file
/// The kinds of resources the tracker cleans up, with their CPython wire names.

#include <optional>
#include <string_view>

namespace steward {

/// What a tracked name refers to, and so how the tracker removes it at shutdown.
enum class resource_type {
    shared_memory,  ///< POSIX shared memory: shm_unlink ("shared_memory", as CPython)
    semaphore,      ///< POSIX named semaphore: sem_unlink ("semaphore", as CPython)
    file,           ///< a file: unlink ("file"; steward only)
    directory,      ///< a directory tree, removed without following symlinks ("directory"; steward only)
    noop,           ///< liveness probe only; never registered ("noop", as CPython)
};

/// The wire name of @p type ("shared_memory", "semaphore", "file", "directory", "noop").
[[nodiscard]] std::string_view to_string(resource_type type) noexcept;

/// Parses a wire name; std::nullopt for anything else (including CPython's test-only "dummy").
[[nodiscard]] std::optional<resource_type> parse_resource_type(std::string_view name) noexcept;

}  // namespace steward
