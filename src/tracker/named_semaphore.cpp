// steward::named_semaphore: register before create, unlink before unregister (see the header).
#include <steward/named_semaphore.hpp>

#include "tracker/cleanup.hpp"
#include "tracker/register_then_create.hpp"
#include "tracker/unlink_then_unregister.hpp"
#include <steward/shared_memory.hpp>
#include <steward/unique_fd.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <string>
#include <utility>

namespace steward {
namespace {

// Creates the semaphore @p name (canonical, "/x") holding @p value, like sem_open(O_CREAT|O_EXCL)
// but without a temporary name: glibc writes the new semaphore to a randomly named
// /dev/shm/sem.XXXXXX and then links it, so a SIGKILL at that moment leaves a file no tracker can
// know about. Here the file is written while it has no name (O_TMPFILE) and linkat() names it
// (EEXIST when the name is taken, as O_EXCL): killed at any point, the process leaves nothing.
// Returns 0 or an errno; EOPNOTSUPP when this way is not available (no O_TMPFILE on the
// filesystem, no /proc), and the caller falls back to sem_open.
int link_new_semaphore(const std::string& name, unsigned value) {
    sem_t initial;
    if (::sem_init(&initial, 1, value) != 0) return errno;
    unique_fd fd(::open("/dev/shm", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
    if (!fd) return errno == EISDIR || errno == EOPNOTSUPP || errno == EINVAL ? EOPNOTSUPP : errno;
    const auto* bytes = reinterpret_cast<const char*>(&initial);
    for (std::size_t done = 0; done < sizeof initial;) {
        const ssize_t n = ::write(fd.get(), bytes + done, sizeof initial - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return n < 0 ? errno : EIO;
        done += static_cast<std::size_t>(n);
    }
    char path[PATH_MAX];  // the file behind the semaphore, as the daemon's cleanup maps it
    if (!detail::tracking::object_path(resource_type::semaphore, name, path, sizeof path))
        return ENAMETOOLONG;
    // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; the /proc link works for anyone.
    if (::linkat(fd.get(), "", AT_FDCWD, path, AT_EMPTY_PATH) == 0) return 0;
    if (errno != ENOENT && errno != EPERM) return errno;
    const std::string self = "/proc/self/fd/" + std::to_string(fd.get());
    if (::linkat(AT_FDCWD, self.c_str(), AT_FDCWD, path, AT_SYMLINK_FOLLOW) == 0) return 0;
    if (errno == ENOENT && ::access("/proc/self/fd", F_OK) != 0) return EOPNOTSUPP;
    return errno;
}

// Opens a new semaphore (see above); SEM_FAILED with errno set on failure.
sem_t* open_new_semaphore(const std::string& name, unsigned value) {
    const int err = link_new_semaphore(name, value);
    if (err == EOPNOTSUPP) return ::sem_open(name.c_str(), O_CREAT | O_EXCL, 0600, value);
    if (err != 0) {
        errno = err;
        return SEM_FAILED;
    }
    sem_t* s = ::sem_open(name.c_str(), 0);
    if (s == SEM_FAILED) {
        const int open_err = errno;
        (void)::sem_unlink(name.c_str());  // ours, just linked: never leave it unregistered
        errno = open_err;
    }
    return s;
}

}  // namespace

named_semaphore::named_semaphore(named_semaphore&& other) noexcept
    : name_(std::move(other.name_)),
      sem_(std::exchange(other.sem_, nullptr)),
      tracker_(std::exchange(other.tracker_, nullptr)),
      creator_(std::exchange(other.creator_, -1)) {}

named_semaphore& named_semaphore::operator=(named_semaphore&& other) noexcept {
    if (this != &other) {
        reset();
        name_ = std::move(other.name_);
        sem_ = std::exchange(other.sem_, nullptr);
        tracker_ = std::exchange(other.tracker_, nullptr);
        creator_ = std::exchange(other.creator_, -1);
    }
    return *this;
}

named_semaphore::~named_semaphore() {
    reset();
}

void named_semaphore::reset() noexcept {
    if (tracker_ && creator_ == ::getpid()) {
        std::error_code ec;
        unlink(ec);
    }
    if (sem_) ::sem_close(sem_);
    sem_ = nullptr;
    tracker_ = nullptr;
    creator_ = -1;
}

named_semaphore named_semaphore::create_registered(tracker& t, std::string name, unsigned value,
                                                   bool withdraw, std::error_code& ec) {
    named_semaphore sem;
    sem_t* s = open_new_semaphore(name, value);
    if (s == SEM_FAILED) {
        ec = errno_code(errno);
        std::error_code ignore;
        if (withdraw) t.unregister_resource(name, resource_type::semaphore, ignore);
        return {};
    }
    sem.sem_ = s;
    sem.name_ = std::move(name);
    sem.tracker_ = &t;
    sem.creator_ = ::getpid();
    return sem;
}

named_semaphore named_semaphore::create(tracker& t, std::string_view name, unsigned value,
                                        std::error_code& ec) {
    std::string canonical = shared_memory::canonical_name(name);
    ec = detail::check_posix_name(canonical);
    if (ec) return {};
    return detail::register_then_create<named_semaphore>(
        t, std::move(canonical), resource_type::semaphore,
        [&t, value](std::string n, bool withdraw, std::error_code& e) {
            return create_registered(t, std::move(n), value, withdraw, e);
        },
        ec);
}

named_semaphore named_semaphore::create(tracker& t, std::string_view name, unsigned value) {
    std::error_code ec;
    return detail::value_or_throw(create(t, name, value, ec), ec, "named_semaphore::create",
                                  shared_memory::canonical_name(name));
}

named_semaphore named_semaphore::open_existing(tracker* t, std::string_view name, std::error_code& ec) {
    std::string canonical = shared_memory::canonical_name(name);
    ec = detail::check_posix_name(canonical);
    if (ec) return {};
    named_semaphore sem;
    sem_t* s = ::sem_open(canonical.c_str(), 0);
    if (s == SEM_FAILED) {
        ec = errno_code(errno);
        return {};
    }
    sem.sem_ = s;
    sem.name_ = std::move(canonical);
    if (t) {
        t->register_resource(sem.name_, resource_type::semaphore, ec);
        if (ec) return {};
        sem.tracker_ = t;
    }
    return sem;
}

named_semaphore named_semaphore::attach(std::string_view name, std::error_code& ec) {
    return open_existing(nullptr, name, ec);
}
named_semaphore named_semaphore::attach(std::string_view name) {
    std::error_code ec;
    return detail::value_or_throw(attach(name, ec), ec, "named_semaphore::attach",
                                  shared_memory::canonical_name(name));
}
named_semaphore named_semaphore::attach(tracker& t, std::string_view name, std::error_code& ec) {
    return open_existing(&t, name, ec);
}
named_semaphore named_semaphore::attach(tracker& t, std::string_view name) {
    std::error_code ec;
    return detail::value_or_throw(attach(t, name, ec), ec, "named_semaphore::attach",
                                  shared_memory::canonical_name(name));
}

void named_semaphore::unlink(std::error_code& ec) {
    detail::unlink_then_unregister(name_, resource_type::semaphore, ::sem_unlink, tracker_, ec);
}

void named_semaphore::unlink() {
    std::error_code ec;
    unlink(ec);
    if (ec) throw std::system_error(ec, "named_semaphore::unlink " + name_);
}

void named_semaphore::post() {
    if (!sem_ || ::sem_post(sem_) != 0)
        throw std::system_error(errno_code(sem_ ? errno : EINVAL), "sem_post");
}

void named_semaphore::wait() {
    if (!sem_) throw std::system_error(errno_code(EINVAL), "sem_wait");
    while (::sem_wait(sem_) != 0) {
        if (errno != EINTR) throw std::system_error(errno_code(errno), "sem_wait");
    }
}

bool named_semaphore::try_wait() {
    if (!sem_) throw std::system_error(errno_code(EINVAL), "sem_trywait");
    while (::sem_trywait(sem_) != 0) {
        if (errno == EAGAIN) return false;
        if (errno != EINTR) throw std::system_error(errno_code(errno), "sem_trywait");
    }
    return true;
}

namespace detail {

void async_create_named_semaphore(
    tracker& t, const std::string& name, unsigned value,
    asio::any_completion_handler<void(std::error_code, named_semaphore)> handler) {
    std::string canonical = shared_memory::canonical_name(name);
    const std::error_code bad = check_posix_name(canonical);
    async_register_then_create<named_semaphore>(
        t, std::move(canonical), resource_type::semaphore, bad,
        [&t, value](std::string n, bool withdraw, std::error_code& ec) {
            return named_semaphore::create_registered(t, std::move(n), value, withdraw, ec);
        },
        std::move(handler));
}

}  // namespace detail

}  // namespace steward
