#pragma once
// Removing what the tracker was asked to remove, and only that: shm_unlink, sem_unlink, unlink,
// and a directory walk that never follows a symlink. Every removal first checks that the object
// under the name is still the one seen at REGISTER time (same st_dev/st_ino), so a name that was
// unlinked and reused by someone else is left alone.

#include "tracker/registry.hpp"

#include <steward/resource_type.hpp>

#include <functional>
#include <optional>
#include <string_view>
#include <system_error>

namespace steward::detail::tracking {

/// The filesystem object behind a tracked name: `/dev/shm/<name>` for shared memory,
/// `/dev/shm/sem.<name>` for semaphores (glibc's layout), the path itself for files and
/// directories. Returns false when the name cannot be mapped (too long). @p out gets a
/// NUL-terminated path.
[[nodiscard]] bool object_path(resource_type type, std::string_view name, char* out,
                               std::size_t out_size) noexcept;

/// lstat() of the object behind @p name. std::nullopt when it does not exist (or cannot be
/// looked up, reported through @p ec unless it is ENOENT/ENOTDIR).
[[nodiscard]] std::optional<file_identity> lookup_identity(resource_type type, std::string_view name,
                                                           std::error_code& ec) noexcept;

/// Lists /dev/shm once and calls on_entry(type, canonical name, identity) for each shared memory
/// segment (`/dev/shm/<name>`, type shared_memory) and semaphore (`/dev/shm/sem.<name>`), with
/// the identity taken from the directory entry — one getdents per few hundred objects instead of
/// one lstat per name. Gives up (returns false, having perhaps called on_entry for some) when
/// /dev/shm is not a tmpfs (where d_ino might not be st_ino), cannot be read, or holds more than
/// @p max_entries entries.
bool scan_shm_directory(
    std::size_t max_entries,
    const std::function<void(resource_type, std::string_view, const file_identity&)>& on_entry);

enum class cleanup_result {
    removed,       // the object was removed
    already_gone,  // nothing under that name any more (someone removed it first)
    replaced,      // the name now refers to a different object: left alone
    failed,        // removal failed: see the reported errors
};

/// Called for each failure: the path (or the name) that could not be removed and the error.
using failure_callback = std::function<void(std::string_view what, std::error_code ec)>;

/// Removes the object behind (@p type, @p name) if it is still @p expected (when given).
/// Directories are removed as a whole tree (see remove_tree()).
cleanup_result remove_resource(resource_type type, std::string_view name,
                               const std::optional<file_identity>& expected,
                               const failure_callback& on_failure);

/// Removes the directory tree at the absolute path @p path without following symlinks: the
/// directory is opened with O_NOFOLLOW|O_DIRECTORY relative to its parent, checked against
/// @p expected, and walked fd-relative (openat/unlinkat), so a symlink anywhere in the tree is
/// removed as a link and its target is never touched. A symlink at @p path itself is removed as a
/// link. Refuses relative paths, "/" and "."/".." components (EINVAL). Keeps going after a
/// failure and reports each one.
cleanup_result remove_tree(std::string_view path, const std::optional<file_identity>& expected,
                           const failure_callback& on_failure);

}  // namespace steward::detail::tracking
