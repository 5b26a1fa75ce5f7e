// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title AnchorRegistry
/// @notice The chain as a witness of transparency logs. For each log origin the owner registers
/// the log's P-256 public key; anchorers then submit the log's signed checkpoints. A checkpoint is
/// accepted only if (1) the log's key signed its C2SP note text, checked here with the P256VERIFY
/// precompile of EIP-7951, and (2) it consistently extends the last checkpoint accepted for the
/// origin, checked here with an RFC 9162 §2.1.4.2 consistency proof. Nothing changes or removes
/// an accepted checkpoint, so neither the owner nor an anchorer (nor a thief of their keys) can
/// fork, rewrite or truncate an anchored history.
///
/// Requirement of the chain: the P256VERIFY precompile at address 0x100 (EIP-7951; Osaka, and
/// Anvil's default hardfork). On a chain without it the call returns no data, every signature
/// check fails and nothing is ever accepted (fails closed).
///
/// Not upgradeable: no proxy, no delegatecall, no selfdestruct.
contract AnchorRegistry {
    /// The P256VERIFY precompile (EIP-7951): input hash(32) || r(32) || s(32) || x(32) || y(32);
    /// output 32 bytes holding 1 on success, nothing on failure.
    address private constant P256VERIFY = address(0x100);
    /// P-256 field prime and curve coefficient b (a = -3).
    uint256 private constant P256_P = 0xffffffff00000001000000000000000000000000ffffffffffffffffffffffff;
    uint256 private constant P256_B = 0x5ac635d8aa3a93e7b3ebbd55769886bc651d06b0cc53b0f63bce3c3e27d2604b;

    bytes private constant BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    struct PublicKey {
        bytes32 x;
        bytes32 y;
    }

    /// One slot per origin: the latest accepted checkpoint's size and when it was accepted.
    struct Latest {
        uint64 size;
        uint64 blockNumber;
        uint64 timestamp;
        bool registered;
    }

    address public owner;
    mapping(address => bool) public isAnchorer;
    mapping(bytes32 => PublicKey) private _keys;
    mapping(bytes32 => Latest) private _latest;
    /// origin hash => tree size => root: one new slot per accepted checkpoint.
    mapping(bytes32 => mapping(uint64 => bytes32)) private _roots;

    event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);
    event AnchorerSet(address indexed anchorer, bool allowed);
    event LogRegistered(bytes32 indexed originHash, string origin, bytes32 x, bytes32 y);
    event LogKeyRotated(bytes32 indexed originHash, bytes32 x, bytes32 y);
    /// An accepted checkpoint. The origin and the signature (r || s) are in the transaction's
    /// calldata: with them anyone can rebuild the signed note.
    event CheckpointAnchored(bytes32 indexed originHash, uint64 size, bytes32 root, uint64 previousSize);

    error NotOwner(address caller);
    error NotAnchorer(address caller);
    error ZeroAddress();
    error OwnerIsAnchorer(address account);
    error InvalidOrigin();
    error InvalidPublicKey();
    error OriginAlreadyRegistered(bytes32 originHash);
    error UnknownOrigin(bytes32 originHash);
    error EmptyTree();
    error ZeroRoot();
    error BadSignature();
    error AlreadyAnchored(bytes32 originHash, uint64 size, bytes32 root);
    /// The log's key signed a different root for a size already anchored: evidence of a fork.
    error Fork(uint64 size, bytes32 anchoredRoot, bytes32 root);
    error SizeBelowLatest(uint64 latestSize, uint64 size);
    error BadConsistencyProof(uint64 fromSize, uint64 toSize);

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        _;
    }

    constructor() {
        owner = msg.sender;
        emit OwnershipTransferred(address(0), msg.sender);
    }

    // --- administration (owner) -------------------------------------------------------------

    function transferOwnership(address newOwner) external onlyOwner {
        if (newOwner == address(0)) revert ZeroAddress();
        if (isAnchorer[newOwner]) revert OwnerIsAnchorer(newOwner);
        emit OwnershipTransferred(owner, newOwner);
        owner = newOwner;
    }

    /// @notice Add (`allowed`) or remove an anchorer. The owner is never an anchorer.
    function setAnchorer(address anchorer, bool allowed) external onlyOwner {
        if (anchorer == address(0)) revert ZeroAddress();
        if (allowed && anchorer == owner) revert OwnerIsAnchorer(anchorer);
        isAnchorer[anchorer] = allowed;
        emit AnchorerSet(anchorer, allowed);
    }

    /// @notice Register a log: its origin (the checkpoint's first line) and its P-256 key.
    function registerLog(string calldata origin, bytes32 x, bytes32 y) external onlyOwner {
        _checkOrigin(origin);
        _checkKey(x, y);
        bytes32 o = keccak256(bytes(origin));
        if (_latest[o].registered) revert OriginAlreadyRegistered(o);
        _latest[o].registered = true;
        _keys[o] = PublicKey(x, y);
        emit LogRegistered(o, origin, x, y);
    }

    /// @notice A new key for a registered log (the log rotated its signing key). Accepted
    /// checkpoints stay; later ones must still extend them.
    function rotateLogKey(string calldata origin, bytes32 x, bytes32 y) external onlyOwner {
        _checkKey(x, y);
        bytes32 o = keccak256(bytes(origin));
        if (!_latest[o].registered) revert UnknownOrigin(o);
        _keys[o] = PublicKey(x, y);
        emit LogKeyRotated(o, x, y);
    }

    // --- anchoring ----------------------------------------------------------------------------

    /// @notice Accept the checkpoint `<origin>\n<size>\n<base64 root>\n` signed by the log's key
    /// (`signature`: r || s, 64 bytes), with `consistencyProof` (RFC 9162 §2.1.4.1) from the
    /// latest accepted checkpoint of the origin; empty for the origin's first checkpoint.
    function anchor(
        string calldata origin,
        uint64 size,
        bytes32 root,
        bytes calldata signature,
        bytes32[] calldata consistencyProof
    ) external {
        if (!isAnchorer[msg.sender]) revert NotAnchorer(msg.sender);
        bytes32 o = keccak256(bytes(origin));
        uint64 previousSize = _check(o, origin, size, root, signature, consistencyProof);
        _roots[o][size] = root;
        _latest[o] = Latest(size, uint64(block.number), uint64(block.timestamp), true);
        emit CheckpointAnchored(o, size, root, previousSize);
    }

    /// Every check of `anchor`, in order; returns the latest accepted size (0: none yet).
    function _check(
        bytes32 o,
        string calldata origin,
        uint64 size,
        bytes32 root,
        bytes calldata signature,
        bytes32[] calldata consistencyProof
    ) private view returns (uint64) {
        Latest memory last = _latest[o];
        if (!last.registered) revert UnknownOrigin(o);
        if (size == 0) revert EmptyTree();
        if (root == bytes32(0)) revert ZeroRoot();
        bytes32 anchored = _roots[o][size];
        if (anchored == root) revert AlreadyAnchored(o, size, root);

        _requireSigned(o, origin, size, root, signature);
        if (anchored != bytes32(0)) revert Fork(size, anchored, root);
        if (size < last.size) revert SizeBelowLatest(last.size, size);
        _requireConsistent(o, last.size, size, root, consistencyProof);
        return last.size;
    }

    function _requireSigned(bytes32 o, string calldata origin, uint64 size, bytes32 root, bytes calldata signature)
        private
        view
    {
        PublicKey memory key = _keys[o];
        if (!_verifySignature(_noteHash(origin, size, root), signature, key.x, key.y)) {
            revert BadSignature();
        }
    }

    function _requireConsistent(bytes32 o, uint64 fromSize, uint64 size, bytes32 root, bytes32[] calldata proof)
        private
        view
    {
        if (fromSize == 0) {
            if (proof.length != 0) revert BadConsistencyProof(0, size);
        } else if (!_consistent(fromSize, size, _roots[o][fromSize], root, proof)) {
            revert BadConsistencyProof(fromSize, size);
        }
    }

    // --- views --------------------------------------------------------------------------------

    /// @notice The root anchored for `origin` at `size`; zero if none.
    function rootAt(string calldata origin, uint64 size) external view returns (bytes32) {
        return _roots[keccak256(bytes(origin))][size];
    }

    /// @notice The latest accepted checkpoint of `origin` and the block that accepted it; all
    /// zero if none. Reverts with UnknownOrigin for an origin never registered.
    function latest(string calldata origin)
        external
        view
        returns (uint64 size, bytes32 root, uint64 blockNumber, uint64 timestamp)
    {
        bytes32 o = keccak256(bytes(origin));
        Latest memory l = _latest[o];
        if (!l.registered) revert UnknownOrigin(o);
        return (l.size, _roots[o][l.size], l.blockNumber, l.timestamp);
    }

    /// @notice The log's registered P-256 key.
    function logKey(string calldata origin) external view returns (bytes32 x, bytes32 y) {
        bytes32 o = keccak256(bytes(origin));
        if (!_latest[o].registered) revert UnknownOrigin(o);
        PublicKey memory key = _keys[o];
        return (key.x, key.y);
    }

    /// @notice The C2SP checkpoint note text the log signs: `<origin>\n<size>\n<base64 root>\n`.
    function checkpointNote(string calldata origin, uint64 size, bytes32 root) public pure returns (bytes memory note) {
        bytes memory table = BASE64;
        note = new bytes(bytes(origin).length + 68); // the longest: 20 digits, 44 base64 characters, 3 newlines
        uint256 start;
        assembly ("memory-safe") {
            start := add(note, 32)
        }
        uint256 length = _writeNote(start, table, origin, size, root) - start;
        assembly ("memory-safe") {
            mstore(note, length)
        }
    }

    // --- internals ----------------------------------------------------------------------------

    function _checkOrigin(string calldata origin) private pure {
        bytes calldata b = bytes(origin);
        if (b.length == 0) revert InvalidOrigin();
        for (uint256 i = 0; i < b.length; ++i) {
            // C2SP: no ASCII control characters; the origin is one line.
            if (uint8(b[i]) < 0x20 || uint8(b[i]) == 0x7f) revert InvalidOrigin();
        }
    }

    /// A point on P-256: 0 < x, y < p and y² = x³ - 3x + b (mod p).
    function _checkKey(bytes32 x, bytes32 y) private pure {
        uint256 px = uint256(x);
        uint256 py = uint256(y);
        if (px == 0 || py == 0 || px >= P256_P || py >= P256_P) revert InvalidPublicKey();
        uint256 rhs = addmod(mulmod(mulmod(px, px, P256_P), px, P256_P), mulmod(P256_P - 3, px, P256_P), P256_P);
        rhs = addmod(rhs, P256_B, P256_P);
        if (mulmod(py, py, P256_P) != rhs) revert InvalidPublicKey();
    }

    /// SHA-256 of the note text, built in free memory (not allocated) and hashed by the precompile.
    function _noteHash(string calldata origin, uint64 size, bytes32 root) private view returns (bytes32 h) {
        bytes memory table = BASE64;
        uint256 start;
        assembly ("memory-safe") {
            start := mload(0x40)
        }
        uint256 end = _writeNote(start, table, origin, size, root);
        assembly ("memory-safe") {
            if iszero(staticcall(gas(), 0x02, start, sub(end, start), 0x00, 0x20)) { revert(0, 0) }
            h := mload(0x00)
        }
    }

    /// Writes `<origin>\n<size in decimal>\n<base64 root>\n` at `p`; returns where it ends.
    function _writeNote(uint256 p, bytes memory table, string calldata origin, uint64 size, bytes32 root)
        private
        pure
        returns (uint256 end)
    {
        assembly ("memory-safe") {
            calldatacopy(p, origin.offset, origin.length)
            p := add(p, origin.length)
            mstore8(p, 0x0a)
            p := add(p, 1)
            let digits := 1
            for { let v := div(size, 10) } v { v := div(v, 10) } { digits := add(digits, 1) }
            let q := add(p, digits)
            for { let v := size } 1 {} {
                q := sub(q, 1)
                mstore8(q, add(48, mod(v, 10)))
                v := div(v, 10)
                if iszero(v) { break }
            }
            p := add(p, digits)
            mstore8(p, 0x0a)
            p := add(p, 1)
            // Standard padded base64 of 32 bytes: ten groups of 24 bits (four characters each),
            // then the last 16 bits padded to 18 (three characters) and '='.
            let t := add(table, 1) // mload(t + i) ends with the table's byte i
            for { let i := 0 } lt(i, 10) { i := add(i, 1) } {
                let chunk := and(shr(sub(232, mul(24, i)), root), 0xffffff)
                mstore8(p, mload(add(t, and(shr(18, chunk), 63))))
                mstore8(add(p, 1), mload(add(t, and(shr(12, chunk), 63))))
                mstore8(add(p, 2), mload(add(t, and(shr(6, chunk), 63))))
                mstore8(add(p, 3), mload(add(t, and(chunk, 63))))
                p := add(p, 4)
            }
            let last := shl(2, and(root, 0xffff))
            mstore8(p, mload(add(t, and(shr(12, last), 63))))
            mstore8(add(p, 1), mload(add(t, and(shr(6, last), 63))))
            mstore8(add(p, 2), mload(add(t, and(last, 63))))
            mstore8(add(p, 3), 0x3d)
            mstore8(add(p, 4), 0x0a)
            end := add(p, 5)
        }
    }

    function _verifySignature(bytes32 digest, bytes calldata signature, bytes32 x, bytes32 y)
        private
        view
        returns (bool)
    {
        if (signature.length != 64) return false;
        (bool ok, bytes memory out) = P256VERIFY.staticcall(abi.encodePacked(digest, signature, x, y));
        return ok && out.length == 32 && uint256(bytes32(out)) == 1;
    }

    /// RFC 9162 §2.1.4.2, for 0 < fromSize < toSize (the caller has checked); in assembly, as
    /// it runs once per proof hash. Node hashes go through the SHA-256 precompile (0x02).
    function _consistent(uint64 fromSize, uint64 toSize, bytes32 fromRoot, bytes32 toRoot, bytes32[] calldata proof)
        private
        view
        returns (bool ok)
    {
        assembly ("memory-safe") {
            let buf := mload(0x40) // 0x01 || left || right, in free memory (not allocated)
            mstore8(buf, 0x01)
            function node(b, left, right) -> h {
                mstore(add(b, 1), left)
                mstore(add(b, 33), right)
                if iszero(staticcall(gas(), 0x02, b, 65, 0x00, 0x20)) { revert(0, 0) }
                h := mload(0x00)
            }
            let len := proof.length
            let ptr := proof.offset
            let end := add(ptr, mul(len, 32))
            let fr := fromRoot
            if and(fromSize, sub(fromSize, 1)) {
                // not a power of two: the proof starts with the old tree's largest complete subtree
                fr := calldataload(ptr)
                ptr := add(ptr, 32)
            }
            let sr := fr
            let fn := sub(fromSize, 1)
            let sn := sub(toSize, 1)
            for {} and(fn, 1) {} {
                fn := shr(1, fn)
                sn := shr(1, sn)
            }
            ok := gt(len, 0)
            for {} lt(ptr, end) { ptr := add(ptr, 32) } {
                if iszero(sn) {
                    ok := 0
                    break
                }
                let c := calldataload(ptr)
                switch or(and(fn, 1), eq(fn, sn))
                case 0 { sr := node(buf, sr, c) }
                default {
                    fr := node(buf, c, fr)
                    sr := node(buf, c, sr)
                    for {} and(iszero(and(fn, 1)), iszero(iszero(fn))) {} {
                        fn := shr(1, fn)
                        sn := shr(1, sn)
                    }
                }
                fn := shr(1, fn)
                sn := shr(1, sn)
            }
            ok := and(ok, and(iszero(sn), and(eq(fr, fromRoot), eq(sr, toRoot))))
        }
    }}
