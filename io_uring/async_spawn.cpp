#include <steward/io/async_spawn.hpp>

#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <algorithm>
#include <cerrno>
#include <csignal>
#include <new>
#include <string_view>

extern char** environ;

namespace steward::io {
namespace {

class spawn_attributes {
public:
    spawn_attributes() { ok_ = ::posix_spawnattr_init(&attr_) == 0; }
    ~spawn_attributes() {
        if (ok_) ::posix_spawnattr_destroy(&attr_);
    }
    spawn_attributes(const spawn_attributes&) = delete;
    spawn_attributes& operator=(const spawn_attributes&) = delete;
    [[nodiscard]] bool ok() const noexcept { return ok_; }
    posix_spawnattr_t* get() noexcept { return &attr_; }

private:
    posix_spawnattr_t attr_{};
    bool ok_ = false;
};

class file_actions {
public:
    file_actions() { ok_ = ::posix_spawn_file_actions_init(&actions_) == 0; }
    ~file_actions() {
        if (ok_) ::posix_spawn_file_actions_destroy(&actions_);
    }
    file_actions(const file_actions&) = delete;
    file_actions& operator=(const file_actions&) = delete;
    [[nodiscard]] bool ok() const noexcept { return ok_; }
    posix_spawn_file_actions_t* get() noexcept { return &actions_; }

private:
    posix_spawn_file_actions_t actions_{};
    bool ok_ = false;
};

int make_sigset(const std::vector<int>& signals, sigset_t& set) noexcept {
    ::sigemptyset(&set);
    for (int s : signals)
        if (::sigaddset(&set, s) != 0) return EINVAL;
    return 0;
}

std::string_view env_name(std::string_view entry) {
    return entry.substr(0, entry.find('='));
}

// The caller's environment with the additions applied (an addition replaces an entry of the same
// name). Reads `environ`: like every exec with an environment, this races with setenv() in other
// threads.
std::vector<std::string> merged_environment(const std::vector<std::string>& additions) {
    std::vector<std::string> env;
    for (char** e = environ; e && *e; ++e) {
        const std::string_view entry(*e);
        const bool replaced = std::any_of(additions.begin(), additions.end(), [&](const std::string& a) {
            return env_name(a) == env_name(entry);
        });
        if (!replaced) env.emplace_back(entry);
    }
    env.insert(env.end(), additions.begin(), additions.end());
    return env;
}

std::vector<char*> pointers(std::vector<std::string>& strings) {
    std::vector<char*> out;
    out.reserve(strings.size() + 1);
    for (auto& s : strings) out.push_back(s.data());
    out.push_back(nullptr);
    return out;
}

// Fills @p actions so that the child ends up with exactly: 0, 1, 2 (unless remapped) and the mapped
// targets. Every source is first copied to a scratch number above every source and target, so
// overlapping mappings (a->b with b->c, swaps, a->a) cannot clobber each other, and the final dup2
// never has source == target (dup2 onto itself would not clear CLOEXEC).
int add_fd_actions(posix_spawn_file_actions_t* actions, const std::vector<fd_mapping>& fds) {
    if (fds.empty()) return ::posix_spawn_file_actions_addclosefrom_np(actions, 3);
    int highest = 2;
    for (const auto& m : fds) highest = std::max({highest, m.parent_fd, m.child_fd});
    const int scratch = highest + 1;
    int rc = 0;
    for (std::size_t i = 0; i < fds.size() && rc == 0; ++i)
        rc = ::posix_spawn_file_actions_adddup2(actions, fds[i].parent_fd, scratch + static_cast<int>(i));
    for (std::size_t i = 0; i < fds.size() && rc == 0; ++i)
        rc = ::posix_spawn_file_actions_adddup2(actions, scratch + static_cast<int>(i), fds[i].child_fd);
    // Everything from the scratch copies up, then the gaps between 3 and the highest target.
    // (glibc ignores close errors of descriptors that are not open.)
    if (rc == 0) rc = ::posix_spawn_file_actions_addclosefrom_np(actions, scratch);
    for (int fd = 3; fd < scratch && rc == 0; ++fd) {
        const bool target =
            std::any_of(fds.begin(), fds.end(), [&](const fd_mapping& m) { return m.child_fd == fd; });
        if (!target) rc = ::posix_spawn_file_actions_addclose(actions, fd);
    }
    return rc;
}

std::error_code validate(const std::vector<std::string>& argv, const spawn_options& options) {
    const auto invalid = std::make_error_code(std::errc::invalid_argument);
    if (argv.empty() || argv[0].empty()) return invalid;
    for (std::size_t i = 0; i < options.fds.size(); ++i) {
        const fd_mapping& m = options.fds[i];
        if (m.child_fd < 0) return invalid;
        if (m.parent_fd < 0 || ::fcntl(m.parent_fd, F_GETFD) < 0)
            return std::make_error_code(std::errc::bad_file_descriptor);
        for (std::size_t j = 0; j < i; ++j)
            if (options.fds[j].child_fd == m.child_fd) return invalid;
    }
    for (const auto& e : options.environment) {
        const auto eq = e.find('=');
        if (eq == std::string::npos || eq == 0) return invalid;
    }
    return {};
}

// posix_spawn reports exec's errno; ENOENT also comes from a bad working directory, so look there
// first.
std::error_code classify_spawn_error(int rc, const spawn_options& options) {
    if (!options.working_directory.empty()) {
        struct stat st {};
        if (::stat(options.working_directory.c_str(), &st) != 0) return errno_code(errno);
        if (!S_ISDIR(st.st_mode)) return std::make_error_code(std::errc::not_a_directory);
        if (::access(options.working_directory.c_str(), X_OK) != 0) return errno_code(errno);
    }
    switch (rc) {
        case ENOENT:
        case EACCES:
        case ENOEXEC:
        case ENOTDIR:
        case ELOOP:
        case EISDIR:
            return errc::executable_not_found;
        default:
            return errno_code(rc);
    }
}

child_process spawn_impl(const asio::any_io_executor& ex, const std::vector<std::string>& argv,
                         const spawn_options& options, std::error_code& ec) {
    if ((ec = validate(argv, options))) return {};

    sigset_t mask;
    sigset_t defaults;
    if (make_sigset(options.blocked_signals, mask) != 0 ||
        make_sigset(options.default_signals, defaults) != 0) {
        ec = std::make_error_code(std::errc::invalid_argument);
        return {};
    }

    std::vector<std::string> args(argv);
    std::vector<char*> arg_ptrs = pointers(args);
    std::vector<std::string> env = merged_environment(options.environment);
    std::vector<char*> env_ptrs = pointers(env);

    spawn_attributes attr;
    file_actions actions;
    if (!attr.ok() || !actions.ok()) {
        ec = std::make_error_code(std::errc::not_enough_memory);
        return {};
    }
    int rc = ::posix_spawnattr_setflags(attr.get(), POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    if (rc == 0) rc = ::posix_spawnattr_setsigmask(attr.get(), &mask);
    if (rc == 0) rc = ::posix_spawnattr_setsigdefault(attr.get(), &defaults);
    if (rc == 0 && !options.working_directory.empty())
        rc = ::posix_spawn_file_actions_addchdir_np(actions.get(), options.working_directory.c_str());
    if (rc == 0) rc = add_fd_actions(actions.get(), options.fds);
    if (rc != 0) {
        ec = errno_code(rc);
        return {};
    }

    pid_t pid = -1;
    rc = ::posix_spawn(&pid, args[0].c_str(), actions.get(), attr.get(), arg_ptrs.data(), env_ptrs.data());
    if (rc != 0) {
        // glibc has already reaped the child that failed to exec.
        ec = classify_spawn_error(rc, options);
        return {};
    }

    unique_fd pidfd{static_cast<int>(::syscall(SYS_pidfd_open, pid, 0u))};  // always CLOEXEC
    if (!pidfd) {
        // Without a pidfd the child could not be waited for or signalled safely: undo the spawn
        // rather than hand out a pid that may be recycled. (ENOSYS: Linux < 5.3.)
        const int err = errno;
        ::kill(pid, SIGKILL);
        while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
        }
        ec = errno_code(err);
        return {};
    }
    try {
        return {ex, pid, std::move(pidfd)};
    } catch (...) {
        // Registering the pidfd with the executor failed; the child_state constructor closed it.
        ::kill(pid, SIGKILL);
        while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
        }
        throw;
    }
}

}  // namespace

child_process spawn(const asio::any_io_executor& ex, const std::vector<std::string>& argv,
                    const spawn_options& options, std::error_code& ec) noexcept {
    ec.clear();
    try {
        return spawn_impl(ex, argv, options, ec);
    } catch (const std::system_error& e) {
        ec = e.code();
    } catch (const std::bad_alloc&) {
        ec = std::make_error_code(std::errc::not_enough_memory);
    } catch (...) {
        ec = std::make_error_code(std::errc::io_error);
    }
    return {};
}

child_process spawn(const asio::any_io_executor& ex, const std::vector<std::string>& argv,
                    const spawn_options& options) {
    std::error_code ec;
    child_process child = spawn(ex, argv, options, ec);
    if (ec) {
        std::string what = "spawn ";
        what += argv.empty() ? std::string("(empty argv)") : "'" + argv[0] + "'";
        if (!options.working_directory.empty()) what += " in '" + options.working_directory + "'";
        throw std::system_error(ec, what);
    }
    return child;
}

}  // namespace steward::io
