// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title ConsentRegistry
/// @notice Consent commitments on chain: for each commitment, its status and validity window.
/// A commitment is SHA-256("medledger:consent:v1\n" || salt || JCS(FHIR Consent)); it says
/// nothing about the patient or the consent without the document and its salt. Anyone who holds
/// both can compute the commitment and read its status here. Only authorized writers (the
/// anchoring service's account) record grants and revocations; the owner manages the writers.
contract ConsentRegistry {
    enum Status {
        Unknown,
        Active,
        Revoked
    }

    struct Entry {
        Status status;
        uint64 validFrom;
        // 0: no end.
        uint64 validUntil;
        uint64 recordedAt;
        uint64 revokedAt;
        // The commitment of the consent version that revoked this one.
        bytes32 revokedBy;
    }

    address public owner;
    mapping(address => bool) public isWriter;
    mapping(bytes32 => Entry) private entries;

    event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);
    event WriterSet(address indexed writer, bool allowed);
    event ConsentGranted(bytes32 indexed commitment, uint64 validFrom, uint64 validUntil);
    event ConsentRevoked(bytes32 indexed commitment, bytes32 indexed revokedBy);

    error NotOwner(address caller);
    error NotWriter(address caller);
    error ZeroAddress();
    error ZeroCommitment();
    error EmptyWindow(uint64 validFrom, uint64 validUntil);
    error AlreadyRecorded(bytes32 commitment);
    error NotActive(bytes32 commitment, Status status);

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        _;
    }

    modifier onlyWriter() {
        if (!isWriter[msg.sender]) revert NotWriter(msg.sender);
        _;
    }

    constructor() {
        owner = msg.sender;
        emit OwnershipTransferred(address(0), msg.sender);
    }

    function transferOwnership(address newOwner) external onlyOwner {
        if (newOwner == address(0)) revert ZeroAddress();
        emit OwnershipTransferred(owner, newOwner);
        owner = newOwner;
    }

    function setWriter(address writer, bool allowed) external onlyOwner {
        if (writer == address(0)) revert ZeroAddress();
        isWriter[writer] = allowed;
        emit WriterSet(writer, allowed);
    }

    /// @notice Record a granted consent version. Each commitment is recorded once.
    function grant(bytes32 commitment, uint64 validFrom, uint64 validUntil) external onlyWriter {
        if (commitment == bytes32(0)) revert ZeroCommitment();
        if (validUntil != 0 && validUntil <= validFrom) revert EmptyWindow(validFrom, validUntil);
        if (entries[commitment].status != Status.Unknown) revert AlreadyRecorded(commitment);
        entries[commitment] = Entry({
            status: Status.Active,
            validFrom: validFrom,
            validUntil: validUntil,
            recordedAt: uint64(block.timestamp),
            revokedAt: 0,
            revokedBy: bytes32(0)
        });
        emit ConsentGranted(commitment, validFrom, validUntil);
    }

    /// @notice Record that the consent version `commitment` was revoked by version `revokedBy`.
    function revoke(bytes32 commitment, bytes32 revokedBy) external onlyWriter {
        Entry storage entry = entries[commitment];
        if (entry.status != Status.Active) revert NotActive(commitment, entry.status);
        if (revokedBy == bytes32(0)) revert ZeroCommitment();
        entry.status = Status.Revoked;
        entry.revokedAt = uint64(block.timestamp);
        entry.revokedBy = revokedBy;
        emit ConsentRevoked(commitment, revokedBy);
    }

    function statusOf(bytes32 commitment) external view returns (Entry memory) {
        return entries[commitment];
    }

    /// @notice Whether the chain witnessed the consent version in force at `when` (seconds): it
    /// was granted, `validFrom <= when < validUntil` (no end when 0), it was not revoked at or
    /// before `when`, and it was recorded here at or before `when`. So it answers for the past:
    /// a later revocation does not undo the time before it.
    /// @dev `recordedAt <= when`: the chain attests only to what it held at `when`. A grant
    /// recorded late with a window reaching back would otherwise prove consent for reads that
    /// happened before anyone could see it; and since the anchoring service revokes a version
    /// before it grants its successor, at most one version of a consent is in force at any time.
    /// The price is the anchoring lag: between consent recording a version and the chain
    /// recording it, the chain does not yet call it in force (`medledger verify consent` states
    /// the lag).
    function isInForce(bytes32 commitment, uint64 when) external view returns (bool) {
        Entry storage entry = entries[commitment];
        if (entry.status == Status.Unknown) return false;
        if (when < entry.recordedAt || when < entry.validFrom) return false;
        if (entry.validUntil != 0 && when >= entry.validUntil) return false;
        return entry.status != Status.Revoked || when < entry.revokedAt;
    }
}
