#include "tracker/cleanup.hpp"

#include "tracker/codec.hpp"

#include <steward/error.hpp>
#include <steward/unique_fd.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <semaphore.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <string>

namespace steward::detail::tracking {
namespace {

constexpr std::size_t path_buffer_size = PATH_MAX + 16;

std::error_code last_error() noexcept {
    return errno_code(errno);
}

file_identity identity_of(const struct stat& st) noexcept {
    return {static_cast<std::uint64_t>(st.st_dev), static_cast<std::uint64_t>(st.st_ino)};
}

// Walks the directory open as @p dir_fd and removes everything in it. @p where is the path of that
// directory, for messages. Every step is relative to an fd opened with O_NOFOLLOW, so a symlink
// planted inside the tree (or swapped in while we walk) is unlinked, never entered.
bool empty_directory(int dir_fd, std::string& where, int depth, const failure_callback& on_failure) {
    if (depth > 512) {
        on_failure(where, errno_code(ELOOP));
        return false;
    }
    const int copy = ::fcntl(dir_fd, F_DUPFD_CLOEXEC, 0);
    if (copy < 0) {
        on_failure(where, last_error());
        return false;
    }
    DIR* dir = ::fdopendir(copy);
    if (!dir) {
        on_failure(where, last_error());
        ::close(copy);
        return false;
    }
    bool ok = true;
    // readdir may miss entries while the directory changes under it, so passes repeat until one
    // finds nothing left (at most three). A failure is reported once and ends the walk here.
    for (int pass = 0; pass < 3 && ok; ++pass) {
        ::rewinddir(dir);
        bool saw_entry = false;
        while (const dirent* ent = ::readdir(dir)) {
            const char* child = ent->d_name;
            if (std::strcmp(child, ".") == 0 || std::strcmp(child, "..") == 0) continue;
            saw_entry = true;
            bool is_dir = ent->d_type == DT_DIR;
            if (ent->d_type == DT_UNKNOWN) {
                struct stat st;
                if (::fstatat(dir_fd, child, &st, AT_SYMLINK_NOFOLLOW) == 0) is_dir = S_ISDIR(st.st_mode);
            }
            const std::size_t mark = where.size();
            where += '/';
            where += child;
            int err = 0;
            if (is_dir) {
                unique_fd sub{::openat(dir_fd, child, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)};
                if (sub) {
                    if (!empty_directory(sub.get(), where, depth + 1, on_failure)) {
                        ok = false;  // already reported inside
                    } else {
                        sub.reset();
                        if (::unlinkat(dir_fd, child, AT_REMOVEDIR) != 0) err = errno;
                    }
                } else if (errno == ENOTDIR || errno == ELOOP) {
                    // Replaced by a non-directory since readdir: remove that as a plain entry.
                    if (::unlinkat(dir_fd, child, 0) != 0) err = errno;
                } else {
                    err = errno;
                }
            } else if (::unlinkat(dir_fd, child, 0) != 0) {
                // EISDIR: it became a directory since readdir; the next pass walks it.
                err = errno == EISDIR ? 0 : errno;
            }
            if (err != 0 && err != ENOENT) {
                on_failure(where, errno_code(err));
                ok = false;
            }
            where.resize(mark);
        }
        if (!saw_entry) break;
    }
    ::closedir(dir);
    return ok;
}

}  // namespace

bool object_path(resource_type type, std::string_view name, char* out, std::size_t out_size) noexcept {
    std::string_view prefix;
    switch (type) {
        case resource_type::shared_memory:
            prefix = "/dev/shm/";
            break;
        case resource_type::semaphore:
            prefix = "/dev/shm/sem.";
            break;
        case resource_type::file:
        case resource_type::directory:
            prefix = "";
            break;
        case resource_type::noop:
            return false;
    }
    if (!prefix.empty() && !name.empty() && name.front() == '/') name.remove_prefix(1);
    if (prefix.size() + name.size() + 1 > out_size) return false;
    std::memcpy(out, prefix.data(), prefix.size());
    std::memcpy(out + prefix.size(), name.data(), name.size());
    out[prefix.size() + name.size()] = '\0';
    return true;
}

std::optional<file_identity> lookup_identity(resource_type type, std::string_view name,
                                             std::error_code& ec) noexcept {
    ec.clear();
    char path[path_buffer_size];
    if (!object_path(type, name, path, sizeof path)) {
        ec = errno_code(ENAMETOOLONG);
        return std::nullopt;
    }
    struct stat st;
    if (::lstat(path, &st) != 0) {
        if (errno != ENOENT && errno != ENOTDIR) ec = last_error();
        return std::nullopt;
    }
    return identity_of(st);
}

bool scan_shm_directory(
    std::size_t max_entries,
    const std::function<void(resource_type, std::string_view, const file_identity&)>& on_entry) {
    unique_fd dir_fd{::open("/dev/shm", O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
    if (!dir_fd) return false;
    struct statfs fs;
    struct stat st;
    if (::fstatfs(dir_fd.get(), &fs) != 0 || fs.f_type != TMPFS_MAGIC || ::fstat(dir_fd.get(), &st) != 0)
        return false;
    DIR* dir = ::fdopendir(dir_fd.get());
    if (!dir) return false;
    (void)dir_fd.release();  // owned by dir now
    bool complete = true;
    std::size_t seen = 0;
    char name[NAME_MAX + 2];
    name[0] = '/';
    for (;;) {
        errno = 0;
        const dirent* ent = ::readdir(dir);
        if (!ent) {
            if (errno != 0) complete = false;
            break;
        }
        if (++seen > max_entries) {
            complete = false;
            break;
        }
        // Only regular files are segments or semaphores; on tmpfs every entry reports its type.
        if (ent->d_type != DT_REG) continue;
        const std::size_t len = std::strlen(ent->d_name);
        std::memcpy(name + 1, ent->d_name, len);
        const file_identity id{static_cast<std::uint64_t>(st.st_dev), static_cast<std::uint64_t>(ent->d_ino)};
        if (len > 4 && std::memcmp(ent->d_name, "sem.", 4) == 0) {
            name[4] = '/';
            on_entry(resource_type::semaphore, std::string_view(name + 4, len - 3), id);
            name[4] = '.';
        }
        on_entry(resource_type::shared_memory, std::string_view(name, len + 1), id);
    }
    ::closedir(dir);
    return complete;
}

cleanup_result remove_tree(std::string_view path, const std::optional<file_identity>& expected,
                           const failure_callback& on_failure) {
    char canonical[max_message_size + 1];
    std::string_view checked;
    if (path.size() > max_message_size ||
        canonical_name(resource_type::directory, path, canonical, checked) != decode_error::none ||
        checked != path) {
        on_failure(path, errno_code(EINVAL));
        return cleanup_result::failed;
    }
    const auto slash = path.rfind('/');
    const std::string parent(slash == 0 ? std::string_view("/") : path.substr(0, slash));
    const std::string base(path.substr(slash + 1));
    unique_fd parent_fd{::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
    if (!parent_fd) {
        if (errno == ENOENT) return cleanup_result::already_gone;
        on_failure(path, last_error());
        return cleanup_result::failed;
    }
    struct stat st;
    if (::fstatat(parent_fd.get(), base.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
        if (errno == ENOENT) return cleanup_result::already_gone;
        on_failure(path, last_error());
        return cleanup_result::failed;
    }
    if (expected && identity_of(st) != *expected) return cleanup_result::replaced;
    if (S_ISLNK(st.st_mode)) {
        // The name is a link: remove the link, never what it points to.
        if (::unlinkat(parent_fd.get(), base.c_str(), 0) != 0) {
            on_failure(path, last_error());
            return cleanup_result::failed;
        }
        return cleanup_result::removed;
    }
    if (!S_ISDIR(st.st_mode)) {
        on_failure(path, errno_code(ENOTDIR));
        return cleanup_result::failed;
    }
    unique_fd dir{::openat(parent_fd.get(), base.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)};
    if (!dir) {
        on_failure(path, last_error());
        return cleanup_result::failed;
    }
    // The fd is what we walk: it must be the object we just checked, not one swapped in between.
    struct stat opened;
    if (::fstat(dir.get(), &opened) != 0 || identity_of(opened) != identity_of(st))
        return cleanup_result::replaced;
    std::string where(path);
    const bool emptied = empty_directory(dir.get(), where, 0, on_failure);
    dir.reset();
    if (::unlinkat(parent_fd.get(), base.c_str(), AT_REMOVEDIR) != 0) {
        // An ENOTEMPTY here is the consequence of a failure already reported inside the tree.
        if (emptied || errno != ENOTEMPTY) on_failure(path, last_error());
        return cleanup_result::failed;
    }
    return emptied ? cleanup_result::removed : cleanup_result::failed;
}

cleanup_result remove_resource(resource_type type, std::string_view name,
                               const std::optional<file_identity>& expected,
                               const failure_callback& on_failure) {
    if (type == resource_type::directory) return remove_tree(name, expected, on_failure);
    if (type == resource_type::noop) return cleanup_result::removed;
    if (expected) {
        std::error_code ec;
        const auto current = lookup_identity(type, name, ec);
        if (ec) {
            on_failure(name, ec);
            return cleanup_result::failed;
        }
        if (!current) return cleanup_result::already_gone;
        if (*current != *expected) return cleanup_result::replaced;
    }
    const std::string name_z(name);
    int rc = 0;
    switch (type) {
        case resource_type::shared_memory:
            rc = ::shm_unlink(name_z.c_str());
            break;
        case resource_type::semaphore:
            rc = ::sem_unlink(name_z.c_str());
            break;
        case resource_type::file:
            rc = ::unlink(name_z.c_str());
            break;
        default:
            break;
    }
    if (rc != 0) {
        if (errno == ENOENT) return cleanup_result::already_gone;
        on_failure(name, last_error());
        return cleanup_result::failed;
    }
    return cleanup_result::removed;
}

}  // namespace steward::detail::tracking
