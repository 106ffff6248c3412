// steward::shared_memory: register before create, unlink before unregister (see the header).
#include <steward/shared_memory.hpp>

#include "tracker/register_then_create.hpp"
#include "tracker/unlink_then_unregister.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <utility>

namespace steward {

namespace {

std::error_code check_arguments(const std::string& canonical, std::size_t size) {
    if (std::error_code ec = detail::check_posix_name(canonical)) return ec;
    if (size == 0) return std::make_error_code(std::errc::invalid_argument);
    return {};
}

// shm_open + ftruncate + mmap of a new segment; on failure nothing is left behind but the name's
// registration (the caller withdraws it).
std::error_code make_segment(const std::string& name, std::size_t size, unique_fd& fd, void*& data) {
    const int raw = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (raw < 0) return errno_code(errno);
    fd.reset(raw);
    std::error_code ec;
    if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) {
        ec = errno_code(errno);
    } else {
        data = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
        if (data == MAP_FAILED) {
            data = nullptr;
            ec = errno_code(errno);
        }
    }
    if (ec) {
        ::shm_unlink(name.c_str());
        fd.reset();
    }
    return ec;
}

}  // namespace

std::string shared_memory::canonical_name(std::string_view name) {
    std::string out;
    if (name.empty() || name.front() != '/') out.push_back('/');
    out.append(name);
    return out;
}

shared_memory::shared_memory(shared_memory&& other) noexcept
    : name_(std::move(other.name_)),
      fd_(std::move(other.fd_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      tracker_(std::exchange(other.tracker_, nullptr)),
      creator_(std::exchange(other.creator_, -1)) {}

shared_memory& shared_memory::operator=(shared_memory&& other) noexcept {
    if (this != &other) {
        reset();
        name_ = std::move(other.name_);
        fd_ = std::move(other.fd_);
        data_ = std::exchange(other.data_, nullptr);
        size_ = std::exchange(other.size_, 0);
        tracker_ = std::exchange(other.tracker_, nullptr);
        creator_ = std::exchange(other.creator_, -1);
    }
    return *this;
}

shared_memory::~shared_memory() {
    reset();
}

void shared_memory::reset() noexcept {
    // Only the creating process removes the segment; forked children share the object's memory
    // image but not its ownership.
    if (tracker_ && creator_ == ::getpid()) {
        std::error_code ec;
        unlink(ec);
    }
    if (data_) ::munmap(data_, size_);
    data_ = nullptr;
    size_ = 0;
    fd_.reset();
    tracker_ = nullptr;
    creator_ = -1;
}

shared_memory shared_memory::create_registered(tracker& t, std::string name, std::size_t size, bool withdraw,
                                               std::error_code& ec) {
    shared_memory shm;
    ec = make_segment(name, size, shm.fd_, shm.data_);
    if (ec) {
        std::error_code ignore;
        if (withdraw) t.unregister_resource(name, resource_type::shared_memory, ignore);
        return {};
    }
    shm.name_ = std::move(name);
    shm.size_ = size;
    shm.tracker_ = &t;
    shm.creator_ = ::getpid();
    return shm;
}

shared_memory shared_memory::create(tracker& t, std::string_view name, std::size_t size,
                                    std::error_code& ec) {
    std::string canonical = canonical_name(name);
    ec = check_arguments(canonical, size);
    if (ec) return {};
    return detail::register_then_create<shared_memory>(
        t, std::move(canonical), resource_type::shared_memory,
        [&t, size](std::string n, bool withdraw, std::error_code& e) {
            return create_registered(t, std::move(n), size, withdraw, e);
        },
        ec);
}

shared_memory shared_memory::create(tracker& t, std::string_view name, std::size_t size) {
    std::error_code ec;
    return detail::value_or_throw(create(t, name, size, ec), ec, "shared_memory::create", canonical_name(name));
}

shared_memory shared_memory::open_existing(tracker* t, std::string_view name, std::error_code& ec) {
    std::string canonical = canonical_name(name);
    ec = detail::check_posix_name(canonical);
    if (ec) return {};
    shared_memory shm;
    const int raw = ::shm_open(canonical.c_str(), O_RDWR | O_CLOEXEC, 0);
    if (raw < 0) {
        ec = errno_code(errno);
        return {};
    }
    shm.fd_.reset(raw);
    struct stat st {};
    if (::fstat(raw, &st) != 0) {
        ec = errno_code(errno);
        return {};
    }
    shm.size_ = static_cast<std::size_t>(st.st_size);
    if (shm.size_ != 0) {
        shm.data_ = ::mmap(nullptr, shm.size_, PROT_READ | PROT_WRITE, MAP_SHARED, raw, 0);
        if (shm.data_ == MAP_FAILED) {
            shm.data_ = nullptr;
            ec = errno_code(errno);
            return {};
        }
    }
    shm.name_ = std::move(canonical);
    if (t) {
        t->register_resource(shm.name_, resource_type::shared_memory, ec);
        if (ec) return {};
        shm.tracker_ = t;
    }
    return shm;
}

shared_memory shared_memory::attach(std::string_view name, std::error_code& ec) {
    return open_existing(nullptr, name, ec);
}
shared_memory shared_memory::attach(std::string_view name) {
    std::error_code ec;
    return detail::value_or_throw(attach(name, ec), ec, "shared_memory::attach", canonical_name(name));
}
shared_memory shared_memory::attach(tracker& t, std::string_view name, std::error_code& ec) {
    return open_existing(&t, name, ec);
}
shared_memory shared_memory::attach(tracker& t, std::string_view name) {
    std::error_code ec;
    return detail::value_or_throw(attach(t, name, ec), ec, "shared_memory::attach", canonical_name(name));
}

void shared_memory::unlink(std::error_code& ec) {
    detail::unlink_then_unregister(name_, resource_type::shared_memory, ::shm_unlink, tracker_, ec);
}

void shared_memory::unlink() {
    std::error_code ec;
    unlink(ec);
    if (ec) throw std::system_error(ec, "shared_memory::unlink " + name_);
}

namespace detail {

void async_create_shared_memory(tracker& t, const std::string& name, std::size_t size,
                                asio::any_completion_handler<void(std::error_code, shared_memory)> handler) {
    std::string canonical = shared_memory::canonical_name(name);
    const std::error_code bad = check_arguments(canonical, size);
    async_register_then_create<shared_memory>(
        t, std::move(canonical), resource_type::shared_memory, bad,
        [&t, size](std::string n, bool withdraw, std::error_code& ec) {
            return shared_memory::create_registered(t, std::move(n), size, withdraw, ec);
        },
        std::move(handler));
}

}  // namespace detail

}  // namespace steward
