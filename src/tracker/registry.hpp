#pragma once
// The daemon's set of tracked names, built to stay small at millions of names: names live back to
// back in paged arenas, each entry is 24 bytes (identity + arena offset + length + type), and the
// open-addressing hash table holds one 64-bit word per slot (entry index + 32 bits of hash, so a
// probe rarely touches an entry that does not match). Pages are never reallocated, so growing the
// registry never holds two copies of it; only the table is rebuilt when it grows.
//
// Removals leave a dead entry and a tombstone; compact() (called by the owner at a quiet moment)
// rebuilds everything once dead entries outnumber live ones, so churn does not grow memory.

#include <steward/resource_type.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

namespace steward::detail::tracking {

/// (st_dev, st_ino) of the object a name referred to when it was registered.
struct file_identity {
    std::uint64_t dev = 0;
    std::uint64_t ino = 0;
    friend bool operator==(const file_identity&, const file_identity&) = default;
};

class registry {
public:
    using handle = std::uint32_t;
    static constexpr handle no_handle = 0xffffffffu;

    registry();
    registry(const registry&) = delete;
    registry& operator=(const registry&) = delete;

    /// Adds (type, name). Returns the entry's handle and whether it was new; a duplicate
    /// collapses onto the existing entry. Names are at most 65535 bytes.
    std::pair<handle, bool> insert(resource_type type, std::string_view name);

    /// Removes (type, name); false when it was not present.
    bool erase(resource_type type, std::string_view name) noexcept;

    /// The handle of (type, name), or no_handle.
    [[nodiscard]] handle find(resource_type type, std::string_view name) const noexcept;

    [[nodiscard]] bool live(handle h) const noexcept { return h < entry_count_ && entry_at(h).live; }
    [[nodiscard]] std::string_view name(handle h) const noexcept;
    [[nodiscard]] resource_type type(handle h) const noexcept {
        return static_cast<resource_type>(entry_at(h).type);
    }

    /// Identity bookkeeping: a new entry is "pending" until the owner looked the object up once.
    [[nodiscard]] bool identity_pending(handle h) const noexcept { return entry_at(h).pending; }
    void set_identity(handle h, const file_identity* id) noexcept;
    /// Marks the entry's identity for a new lookup (a repeated REGISTER names the object now
    /// under the name). Returns false when a lookup was already pending.
    bool renew_identity(handle h) noexcept {
        entry& e = entry_at(h);
        if (e.pending) return false;
        e.pending = 1;
        return true;
    }
    [[nodiscard]] std::optional<file_identity> identity(handle h) const noexcept;

    /// What a listing of the object's directory said about it, for cleanup without a lookup each.
    enum class observation : std::uint8_t { unknown, same_object, other_object, absent };
    void observe(handle h, observation o) noexcept {
        entry_at(h).observed = static_cast<std::uint8_t>(o) & 3;
    }
    [[nodiscard]] observation observed(handle h) const noexcept {
        return static_cast<observation>(entry_at(h).observed);
    }

    [[nodiscard]] std::size_t size() const noexcept { return live_; }
    [[nodiscard]] std::size_t size(resource_type type) const noexcept {
        return per_type_[static_cast<std::size_t>(type)];
    }

    /// Calls f(handle) for every live entry, in insertion order.
    template <typename F>
    void for_each(F&& f) const {
        for (handle h = 0; h < entry_count_; ++h)
            if (entry_at(h).live) f(h);
    }

    /// Rebuilds arenas, entries and table without the dead entries when they outnumber the live
    /// ones. Invalidates every handle. Returns true when it did.
    bool compact();

    /// Bytes held by the registry's own storage (pages and table), for the memory tests.
    [[nodiscard]] std::size_t memory_bytes() const noexcept;

private:
    struct entry {
        std::uint64_t dev;
        std::uint64_t ino;
        std::uint32_t name_offset;  // (arena page << 16) | offset in page
        std::uint16_t name_size;
        std::uint8_t type;
        std::uint8_t live : 1;
        std::uint8_t pending : 1;
        std::uint8_t has_identity : 1;
        std::uint8_t observed : 2;  // an observation, see observation
    };
    static_assert(sizeof(entry) == 24);

    static constexpr std::size_t entries_per_page = 4096;
    static constexpr std::size_t arena_page_size = 65536;

    entry& entry_at(handle h) noexcept { return entry_pages_[h / entries_per_page][h % entries_per_page]; }
    const entry& entry_at(handle h) const noexcept {
        return entry_pages_[h / entries_per_page][h % entries_per_page];
    }
    static std::uint64_t hash(resource_type type, std::string_view name) noexcept;
    std::size_t find_slot(resource_type type, std::string_view name, std::uint64_t h) const noexcept;
    void grow_table(std::size_t capacity);
    std::uint32_t store_name(std::string_view name);

    std::vector<std::unique_ptr<entry[]>> entry_pages_;
    std::vector<std::unique_ptr<char[]>> arena_pages_;
    std::size_t arena_used_ = arena_page_size;  // bytes used in the last arena page
    std::vector<std::uint64_t> table_;          // 0 empty, 1 tombstone, else (hash32 << 32) | (handle + 2)
    std::size_t tombstones_ = 0;
    handle entry_count_ = 0;
    std::size_t live_ = 0;
    std::array<std::size_t, 5> per_type_{};
};

}  // namespace steward::detail::tracking
